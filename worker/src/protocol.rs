//! The stage wire protocol: the messages that travel around a session's ring
//! (origin → stage 1 → … → stage N → origin), their framing and a hostile-input decoder.
//!
//! This module is a pure codec: it turns [`Message`]s into bytes and bytes into
//! [`Message`]s. It knows nothing about QUIC, iroh or sessions; a thin iroh
//! `ProtocolHandler` registered under [`ALPN`] reads frames with [`frame_len`] and
//! [`decode_body`] and hands the messages to the stage service.
//!
//! # Goals
//! - A small, fixed, documented binary format: every message is one length-prefixed frame
//!   whose fields come in a fixed order, little-endian, with no optional framing tricks.
//! - Safe on hostile input: every length is checked against a limit *and* against the bytes
//!   that remain before anything is allocated; unknown kinds, dtypes, codes and flags are
//!   rejected; trailing bytes are rejected; decoding never panics.
//! - Cheap on the hot path: a decode step with f16 hidden states costs `hidden × 2` bytes plus
//!   a 61-byte header, 102 when sealed (see [Bytes per token](#bytes-per-token)).
//!
//! # Non-goals
//! - **No compression**: activations are close to incompressible noise in f16/bf16.
//! - **No encryption or authentication of frames**: QUIC (TLS 1.3) gives both on each link; a
//!   node id is the peer's ed25519 key, so the transport already knows who sent each frame.
//!   The one end-to-end encryption is the sampler's inputs, sealed by the origin for the last
//!   stage so that the stages in between never see token ids ([`seal`]).
//! - **No in-band versioning or negotiation**: the version lives in the ALPN string
//!   ([`ALPN`]). An incompatible change gets a new ALPN (`shoal/stage/6`; version 2 added
//!   spot-checks' `Tap` and `StageOutput`, version 3 speculative steps, version 4 token masks,
//!   version 5 sealed sampler inputs), and a node may
//!   serve both during a migration. Unknown values are therefore errors, not extensions.
//! - **No session semantics**: the codec checks what a frame can say about itself (sizes,
//!   codes, finite sampling parameters, route shape). Whether a session exists, whether a
//!   step's dtype and `hidden` match the session and the model, whether positions follow
//!   the KV cache, whether sampling parameters are in range (`SamplingParams::validate` in
//!   `model-shards`) and whether hidden states are finite (the activation decoder in
//!   `model-shards`, which reads them anyway) are checked later by the stage service.
//!
//! # Framing
//! ```text
//! +--------------------+---------+----------------------------+
//! | body length: u32LE | kind:u8 | fields of that kind ...    |
//! +--------------------+---------+----------------------------+
//!   4 bytes              \------ body: 1..=MAX_FRAME bytes ----/
//! ```
//! A transport reads the 4-byte header, calls [`frame_len`] (which rejects empty and
//! oversized frames before any buffer is allocated), reads exactly that many bytes and calls
//! [`decode_body`]. [`decode`] does both on a complete frame held in memory.
//!
//! Scalars are little-endian; `f32` is the IEEE-754 bit pattern. A vector is a `u32` element
//! count followed by the elements; a string is a `u32` byte length followed by UTF-8; an
//! `Option<u64>` is a flag byte (`0` absent, `1` present) followed by the `u64` when present.
//! Code `0` is never valid for a kind, dtype, reason or error code, so a zeroed buffer is
//! rejected.
//!
//! | kind | message            | direction                              |
//! |------|--------------------|----------------------------------------|
//! | 1    | [`OpenSession`]    | origin → stage 1 → … → stage N        |
//! | 2    | [`Step`]           | origin → stage 1 → … → stage N        |
//! | 3    | [`StepResult`]     | stage N → origin                       |
//! | 4    | [`CloseSession`]   | origin → stage 1 → … → stage N        |
//! | 5    | [`StageError`]     | any stage → origin (or previous hop)   |
//! | 6    | `Ping`             | either way                             |
//! | 7    | `Pong`             | reply to `Ping`                        |
//! | 8    | [`Tap`]            | origin → stage 1 → … → stage N        |
//! | 9    | [`StageOutput`]    | any stage → origin                     |
//!
//! ## 1: `OpenSession` (one per hop; only `hop_index` differs between hops)
//! | offset     | size  | field                          | rule                                   |
//! |------------|-------|--------------------------------|----------------------------------------|
//! | 0          | 1     | kind = 1                       |                                        |
//! | 1          | 8     | `session_id: u64`              | random, chosen by the origin           |
//! | 9          | 32    | `model_id: [u8; 32]`           |                                        |
//! | 41         | 32    | `origin: [u8; 32]`             | the origin's node id (results, errors) |
//! | 73         | 4     | route count `n: u32`           | `1..=`[`MAX_ROUTE_HOPS`]               |
//! | 77         | 40·n  | hops: `node_id [u8;32]`, `start`, `end` (u32) | see below              |
//! | 77+40n     | 4     | `hop_index: u32`               | `< n`: which hop the receiver is       |
//! | 81+40n     | 1     | `wire_dtype: u8`               | 1 f16, 2 bf16, 3 f32                   |
//! | 82+40n     | 4     | `max_len: u32`                 | `≥ 1`                                  |
//! | 86+40n     | 4     | `temperature: f32`             | finite                                 |
//! | 90+40n     | 4     | `top_k: u32`                   | 0 = off                                |
//! | 94+40n     | 4     | `top_p: f32`                   | finite                                 |
//! | 98+40n     | 4     | `min_p: f32`                   | finite                                 |
//! | 102+40n    | 4     | `repetition_penalty: f32`      | finite                                 |
//! | 106+40n    | 4     | `presence_penalty: f32`        | finite                                 |
//! | 110+40n    | 4     | `frequency_penalty: f32`       | finite                                 |
//! | 114+40n    | 8     | `seed: u64`                    |                                        |
//! | 122+40n    | 1     | `top_logprobs: u8`             | `≤` [`MAX_TOP_LOGPROBS`]               |
//! | 123+40n    | 4     | `prompt_len: u32`              | `≤ max_len`                            |
//! | 127+40n    | 4     | address book count `a: u32`    | `≤` [`MAX_ROUTE_HOPS`]` + 1`           |
//! | 131+40n    | …     | `a` entries: `node_id [u8;32]`, address count `c: u8` (`≤` [`MAX_NODE_ADDRS`]), `c` socket addresses | |
//! | …          | 1 (+32) | `seal: Option<[u8; 32]>`     | flag 0 or 1, then the origin's ephemeral X25519 key ([`seal`]) |
//!
//! A socket address is a family byte (`4` or `6`), the IP (4 or 16 bytes) and the port
//! (`u16`). Body size: `132 + 40·n` bytes plus the address book, plus 32 with a seal. Each hop's layer span is
//! `start..end` with `start < end`; hop 0 starts at layer 0 and each hop starts where the
//! previous one ends.
//!
//! The address book tells each stage how to reach the next hop (and the origin) when it has
//! not met it yet; the transport adds the entries to its address lookup. An address is only
//! a hint: QUIC's handshake proves the node id, so a wrong address fails to connect and
//! cannot impersonate anyone.
//!
//! ## 2: `Step` (the same frame travels the whole chain; each stage replaces the payload)
//! | offset  | size | field                          | rule                                        |
//! |---------|------|--------------------------------|---------------------------------------------|
//! | 0       | 1    | kind = 2                       |                                             |
//! | 1       | 8    | `session_id: u64`              |                                             |
//! | 9       | 8    | `step_id: u64`                 | monotonic per session                       |
//! | 17      | 4    | `start_pos: u32`               | `start_pos + len` must not overflow `u32`   |
//! | 21      | 8    | `sample_step: u64`             | index of the token being generated          |
//! | 29      | 4    | history count `k: u32`         | `≤` [`MAX_HISTORY_TAIL`]                    |
//! | 33      | 4·k  | `history_tail: [u32]`          | ids appended to the history since last step |
//! | 33+4k   | 4    | draft count `d: u32`           | `≤` [`MAX_DRAFT`]; `d > 0` ⇒ payload is `d + 1` positions |
//! | 37+4k   | 4·d  | `draft: [u32]`                 | speculative decoding (below); empty otherwise |
//! | 37+4k+4d | 1   | mask tag                       | 0 none, 1 allowed ids, 2 bits (below)       |
//! | …       | 4+4·n | mask: count `n: u32`, `[u32]` | tags 1 and 2 only; `n ≤` [`MAX_MASK_WORDS`] |
//! | …       | 1    | sealed flag                    | 0 or 1                                      |
//! | …       | 4+s  | sealed box: count `s: u32`, bytes | flag 1 only; `s ≤` [`seal::MAX_SEALED`]  |
//! | …       | 1    | payload tag                    | 1 tokens, 2 hidden                          |
//!
//! Let `o` be the offset after the payload tag.
//!
//! Tokens payload (tag 1), stage 1's input:
//! | offset  | size | field                | rule                                 |
//! |---------|------|----------------------|--------------------------------------|
//! | o       | 4    | count `m: u32`       | `1..=`[`MAX_STEP_TOKENS`]            |
//! | o+4     | 4·m  | token ids `[u32]`    |                                      |
//!
//! Hidden payload (tag 2), every other stage's input:
//! | offset  | size | field               | rule                                                     |
//! |---------|------|---------------------|----------------------------------------------------------|
//! | o       | 4    | `t: u32`            | `1..=`[`MAX_STEP_TOKENS`]                                |
//! | o+4     | 4    | `hidden: u32`       | `≥ 1`                                                    |
//! | o+8     | 1    | `dtype: u8`         | 1 f16, 2 bf16, 3 f32                                     |
//! | o+9     | 4    | byte count `b: u32` | `b == t × hidden × size(dtype)` (overflow-checked)       |
//! | o+13    | b    | values              | `t × hidden`, row-major, little-endian                   |
//!
//! `history_tail` and `sample_step` are for the last stage's sampler (repetition, presence
//! and frequency penalties need the token history; the deterministic draw for token `t` comes
//! from `(seed, t)`); forward stages pass them through unchanged. On prefill steps the tail is
//! the ids of that prompt chunk (so the whole prompt arrives over the prefill steps; the
//! first `prompt_len` ids of the history are the prompt), on decode steps it is the ids
//! generated since the previous step (the token it sampled, after the draft ids it accepted).
//!
//! ### Sealed sampler inputs
//! Only the last stage samples, so only it needs the history, the draft ids and the mask.
//! When the session's `OpenSession` carries a `seal` key, the origin puts those three in a
//! box that only the route's last node can open ([`seal`]: X25519 from the origin's
//! ephemeral key to the last node's identity, AES-256-GCM bound to the session and step ids)
//! and the step carries no history, no mask and a draft of zeros (its length is what the
//! stages in between need); a step with a box and ids in the clear is malformed
//! (`UnsealedIds`). Forward stages pass the box on; the last stage opens it and refuses a box
//! that does not open, a clear step in a sealed session and a sealed step in a clear one
//! (`BadShape`, charged to the previous hop), and a sealed session when it has no node
//! identity (`Unsupported`). The stages in between thus see step lengths, positions and hidden
//! states, never token ids; stage 1 still reads the ids it embeds (each step's input).
//!
//! ### Token masks
//! A constrained step (structured outputs, tool calls) carries the set of ids its sampled
//! token may take ([`TokenMask`]): the increasing allowed ids (tag 1), or a bit per id of the
//! vocabulary (tag 2, `⌈vocab / 32⌉` words, bit `i % 32` of word `i / 32`), whichever is
//! smaller. The origin runs the grammar; the last stage sets every other logit to `-inf`
//! before its sampler, and refuses a mask that does not fit the vocabulary or allows nothing
//! (`BadShape`). A step with a draft carries no mask. Forward stages pass it through.
//!
//! ### Speculative decoding
//! A step with a `draft` of `d` ids carries `d + 1` positions: the last sampled id, then the
//! draft. Every stage computes each row with exactly the bits a one-position step gives it
//! (so the tokens are those of ordinary decoding), and the last stage samples position `i`
//! (token `sample_step + i`, with the draft's first `i` ids in the history) until its choice
//! differs from draft id `i` or the draft ends; the [`StepResult`] lists the accepted draft
//! ids and then the last choice. The positions of rejected draft ids stay in the caches
//! until the next step, which starts where the accepted ones end: a stage drops its cached
//! positions from `start_pos` on when `start_pos` is below its cache length and not below
//! the previous (speculative) step's `start_pos + 1`. Any other `start_pos` that differs
//! from the cache length is refused (`BadPosition`).
//!
//! ## 3: `StepResult` (stage N → origin)
//! | offset | size | field                                  | rule                          |
//! |--------|------|----------------------------------------|-------------------------------|
//! | 0      | 1    | kind = 3                               |                               |
//! | 1      | 8    | `session_id: u64`                      |                               |
//! | 9      | 8    | `step_id: u64`                         |                               |
//! | 17     | 4    | `token: u32`                           |                               |
//! | 21     | 4    | `logprob: f32`                         | not NaN, not +∞               |
//! | 25     | 4    | count `m: u32`                         | `≤` [`MAX_TOP_LOGPROBS`]      |
//! | 29     | 8·m  | `(token: u32, logprob: f32)` pairs     | logprobs not NaN, not +∞      |
//! | 29+8m  | 4    | accepted count `a: u32`                | `≤` [`MAX_DRAFT`]             |
//! | 33+8m  | …    | `a` entries: `token: u32`, `logprob: f32`, count `c: u32` (`≤` [`MAX_TOP_LOGPROBS`]), `c` pairs | |
//!
//! The accepted entries are the draft ids of a speculative step the sampler chose too, in
//! order; `token` follows them.
//!
//! ## 4: `CloseSession`
//! | offset | size | field             | rule                                  |
//! |--------|------|-------------------|---------------------------------------|
//! | 0      | 1    | kind = 4          |                                       |
//! | 1      | 8    | `session_id: u64` |                                       |
//! | 9      | 1    | `reason: u8`      | a [`CloseReason`] code (1..=6)        |
//!
//! ## 5: `Error` ([`StageError`])
//! | offset | size     | field                         | rule                                 |
//! |--------|----------|-------------------------------|--------------------------------------|
//! | 0      | 1        | kind = 5                      |                                      |
//! | 1      | 1 (+8)   | `session_id: Option<u64>`     | flag 0 or 1, then the id if 1        |
//! | …      | 1 (+8)   | `step_id: Option<u64>`        | flag 0 or 1, then the id if 1        |
//! | …      | 2        | `code: u16`                   | an [`ErrorCode`] (1..=18)            |
//! | …      | 4        | message length `l: u32`       | `≤` [`MAX_ERROR_MESSAGE`]            |
//! | …      | l        | message, UTF-8                |                                      |
//!
//! The origin knows which peer reported an error from the connection it arrived on.
//!
//! ## 6: `Ping`
//! | offset | size | field          |
//! |--------|------|----------------|
//! | 0      | 1    | kind = 6       |
//! | 1      | 8    | `nonce: u64`   |
//!
//! ## 7: `Pong` (the reply; a node that serves layers describes itself)
//! | offset | size | field                         | rule                                |
//! |--------|------|-------------------------------|-------------------------------------|
//! | 0      | 1    | kind = 7                      |                                     |
//! | 1      | 8    | `nonce: u64`                  | the ping's                          |
//! | 9      | 1    | info flag                     | `0` no layers served, `1` info follows |
//! | 10     | 32   | `model_id: [u8; 32]`          |                                     |
//! | 42     | 4    | `start: u32`                  | `start < end ≤ n_layers`            |
//! | 46     | 4    | `end: u32`                    |                                     |
//! | 50     | 4    | `n_layers: u32`               |                                     |
//! | 54     | 1    | `draining: u8`                | `0` or `1`                          |
//! | 55     | 4    | `sessions: u32`               |                                     |
//! | 59     | 8    | `free_kv_bytes: u64`          |                                     |
//!
//! ## 8: `Tap` (ask every stage for a copy of its output of one step)
//! | offset | size | field             |
//! |--------|------|-------------------|
//! | 0      | 1    | kind = 8          |
//! | 1      | 8    | `session_id: u64` |
//! | 9      | 8    | `step_id: u64`    |
//!
//! Travels down the chain like `CloseSession` (only from the session's opener), right after
//! the step it names or before it. Every stage that forwards hidden states for that step
//! also sends them to the origin as a [`StageOutput`]: at once when it is the decode or
//! speculative step the stage forwarded last (a stage keeps that one step's output per
//! session), otherwise when the step comes. The last stage's answer is its [`StepResult`] as
//! always. The origin sends a session's taps after their steps, so no stage knows a step is
//! checked while it computes it; it compares the outputs with another replica's to
//! spot-check the stages (the router's `verify` module). A new tap replaces the previous one.
//!
//! ## 9: `StageOutput` (stage → origin: the hidden states a stage forwarded for a tapped step)
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 1    | kind = 9                                           |
//! | 1      | 8    | `session_id: u64`                                  |
//! | 9      | 8    | `step_id: u64`                                     |
//! | 17     | …    | hidden states: `t`, `hidden`, `dtype`, `b`, values, as in a `Step`'s hidden payload (without the tag) |
//!
//! # Bytes per token
//! A decode step (one token, one id in `history_tail`, no draft) with f16 or bf16 hidden
//! states is `hidden × 2` bytes of values plus 61 bytes of header (4 frame length + 57 body)
//! per hop: for SmolLM2-135M (`hidden = 576`) that is 1,152 + 61 = 1,213 bytes. Sealed, the
//! id moves into a box of 13 + 28 bytes (nonce and tag): 1,254 bytes. A prefill
//! chunk of `t` tokens costs `t × hidden × 2 + 57 + 4·t` bytes (plus 41 sealed); a speculative step with `d`
//! draft ids `(d + 1) × hidden × 2 + 56 + 4·d` plus its history tail; a constrained step adds
//! `4 + 4·n` bytes of token mask (`n` allowed ids, or `⌈vocab / 32⌉` words: 6 KiB for
//! SmolLM2's 49,152 ids at most). A frame must stay within
//! [`MAX_FRAME`] (64 MiB), so large prefills are sent in chunks (e.g. ≤ 16,384 tokens of a
//! 2,048-wide model in f16). The token-id step into stage 1 and the [`StepResult`] back are
//! tens of bytes.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use std::fmt;

pub use shoal_model_shards::token_mask::TokenMask;

/// ALPN of the stage protocol; the protocol's version lives here and nowhere else.
pub const ALPN: &[u8] = b"shoal/stage/5";

/// Size of the frame header: the body length as a little-endian `u32`.
pub const HEADER_LEN: usize = 4;

/// Largest accepted frame body, in bytes (64 MiB).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Most hops a route may have.
pub const MAX_ROUTE_HOPS: usize = 256;

/// Most tokens (ids, or rows of hidden states) one step may carry.
pub const MAX_STEP_TOKENS: usize = 65_536;

/// Most ids a step's `history_tail` may carry.
pub const MAX_HISTORY_TAIL: usize = 65_536;

/// Most draft ids a speculative [`Step`] may carry (and drafts a [`StepResult`] may accept).
pub const MAX_DRAFT: usize = 64;

/// Most `u32` words of a [`TokenMask`] (a bit mask for 524,288 ids, or as many allowed ids).
pub const MAX_MASK_WORDS: usize = 16_384;

/// Most alternatives a [`StepResult`] may report (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Longest error message, in bytes of UTF-8.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Most socket addresses one address-book entry may list.
pub const MAX_NODE_ADDRS: usize = 16;

/// Errors of decoding (and of [`try_encode`]); each names the field and the limit involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame header announces an empty body (a body holds at least its kind byte).
    #[error("empty frame: a body holds at least its kind byte")]
    EmptyFrame,
    /// The frame body is larger than [`MAX_FRAME`].
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced or actual body length.
        len: u64,
        /// The limit ([`MAX_FRAME`]).
        max: usize,
    },
    /// The bytes end before a field does.
    #[error("truncated at `{field}`: needs {needed} bytes, {remaining} remain")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the body.
        remaining: usize,
    },
    /// The frame header and the bytes handed to [`decode`] disagree.
    #[error("frame header announces {declared} body bytes but {actual} follow")]
    LengthMismatch {
        /// Body length from the header.
        declared: usize,
        /// Bytes present after the header.
        actual: usize,
    },
    /// Bytes remain after the last field of a message.
    #[error("{count} trailing bytes after a complete {kind} message")]
    TrailingBytes {
        /// The message kind decoded.
        kind: &'static str,
        /// Number of bytes left over.
        count: usize,
    },
    /// The kind byte names no message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A dtype code is not 1 (f16), 2 (bf16) or 3 (f32).
    #[error("unknown dtype code {code} in `{field}`")]
    UnknownDtype {
        /// The field holding the code.
        field: &'static str,
        /// The code read.
        code: u8,
    },
    /// A step mask tag is not 0 (none), 1 (ids) or 2 (bits).
    #[error("unknown step mask tag {0}")]
    UnknownMask(u8),
    /// A speculative step carries a token mask.
    #[error("a step with a draft carries no token mask")]
    MaskedDraft,
    /// A step with sealed sampler inputs also carries history ids, draft ids or a mask in
    /// the clear.
    #[error("a sealed step carries no history, draft ids or mask in the clear")]
    UnsealedIds,
    /// A step payload tag is not 1 (tokens) or 2 (hidden).
    #[error("unknown step payload tag {0}")]
    UnknownPayload(u8),
    /// A close reason code is unknown.
    #[error("unknown close reason {0}")]
    UnknownCloseReason(u8),
    /// An error code is unknown.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    /// An option flag is neither 0 nor 1.
    #[error("invalid option flag {value} in `{field}` (expected 0 or 1)")]
    InvalidFlag {
        /// The optional field.
        field: &'static str,
        /// The flag read.
        value: u8,
    },
    /// A count or length is over its limit.
    #[error("`{field}` has {count} elements, the limit is {max}")]
    TooMany {
        /// The vector or string.
        field: &'static str,
        /// The count found.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A vector that must hold something is empty (or a dimension is zero).
    #[error("`{field}` must not be empty or zero")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A float that must be finite is not (or a logprob is NaN or +∞).
    #[error("`{field}` = {value} is not an accepted value (non-finite)")]
    NonFinite {
        /// The field.
        field: &'static str,
        /// The value read.
        value: f32,
    },
    /// The hidden-state byte count does not equal `t × hidden × dtype size`.
    #[error(
        "hidden states of {actual} bytes do not match t = {t} × hidden = {hidden} × {dtype_size} bytes \
         (expected {expected:?})"
    )]
    HiddenSizeMismatch {
        /// Rows.
        t: u32,
        /// Row width.
        hidden: u32,
        /// Bytes per value.
        dtype_size: usize,
        /// `t × hidden × dtype_size`, or `None` if that overflows.
        expected: Option<u64>,
        /// Bytes present.
        actual: u64,
    },
    /// `start_pos` plus the step's length overflows a `u32` position.
    #[error("positions {start_pos}..{start_pos}+{len} overflow u32")]
    PositionOverflow {
        /// First position of the step.
        start_pos: u32,
        /// Tokens in the step.
        len: u32,
    },
    /// A route hop is empty or reversed, or the route is not contiguous from layer 0.
    #[error("route hop {index}: span {start}..{end} {problem}")]
    BadRoute {
        /// Index of the offending hop.
        index: usize,
        /// Its first layer.
        start: u32,
        /// One past its last layer.
        end: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// `hop_index` is outside the route.
    #[error("hop_index {hop_index} is outside a route of {hops} hops")]
    BadHopIndex {
        /// The receiver's claimed hop.
        hop_index: u32,
        /// Hops in the route.
        hops: usize,
    },
    /// `prompt_len` is larger than `max_len`.
    #[error("prompt_len {prompt_len} exceeds max_len {max_len}")]
    PromptTooLong {
        /// Tokens of prompt.
        prompt_len: u32,
        /// Session length limit.
        max_len: u32,
    },
    /// A speculative step's payload does not cover its draft plus one position.
    #[error("a step with {draft} draft ids must cover {} positions, not {positions}", draft + 1)]
    DraftMismatch {
        /// Draft ids.
        draft: usize,
        /// Positions of the payload.
        positions: usize,
    },
    /// A string is not UTF-8.
    #[error("`{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
}

impl ProtocolError {
    /// The [`ErrorCode`] a stage answers with when a peer's frame fails to decode.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } | Self::TooMany { .. } => ErrorCode::TooLarge,
            Self::NonFinite { .. } => ErrorCode::NonFinite,
            Self::HiddenSizeMismatch { .. }
            | Self::Empty { .. }
            | Self::DraftMismatch { .. }
            | Self::MaskedDraft
            | Self::UnsealedIds => ErrorCode::BadShape,
            Self::PositionOverflow { .. } => ErrorCode::BadPosition,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Element type of hidden states on the wire: the engine's own [`WireDType`] and its codes
/// (1 f16, 2 bf16, 3 f32).
pub use shoal_model_shards::activation::WireDType;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How to reach a node: its id and the socket addresses it may be dialed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddrs {
    /// The node's id.
    pub node_id: [u8; 32],
    /// Direct addresses (at most [`MAX_NODE_ADDRS`]).
    pub addrs: Vec<SocketAddr>,
}

/// What a node serving layers says about itself in a [`Message::Pong`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Identity of the model served.
    pub model_id: [u8; 32],
    /// First layer of the span.
    pub start: u32,
    /// One past the last layer of the span.
    pub end: u32,
    /// Layers of the whole model.
    pub n_layers: u32,
    /// Whether the node refuses new sessions.
    pub draining: bool,
    /// Sessions open.
    pub sessions: u32,
    /// KV-cache bytes of the budget still free.
    pub free_kv_bytes: u64,
}

/// One hop of a route: a peer and the span of layers `start..end` it runs for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHop {
    /// The peer's iroh node id (ed25519 public key).
    pub node_id: [u8; 32],
    /// First layer of the span.
    pub start: u32,
    /// One past the last layer of the span.
    pub end: u32,
}

/// A session's sampling parameters, applied by the last stage (wire mirror of
/// `model-shards`' `SamplingParams`, which validates their ranges).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; `0` is greedy.
    pub temperature: f32,
    /// Top-k truncation; `0` is off.
    pub top_k: u32,
    /// Nucleus mass; `1` is off.
    pub top_p: f32,
    /// Min-p ratio; `0` is off.
    pub min_p: f32,
    /// Hugging Face repetition penalty; `1` is neutral.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty; `0` is neutral.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty; `0` is neutral.
    pub frequency_penalty: f32,
    /// Seed of the deterministic draw: step `t` draws from `(seed, t)`.
    pub seed: u64,
}

impl From<&Sampling> for shoal_model_shards::sampler::SamplingParams {
    /// The engine's parameters (`top_k` 0 becomes `None`); range checks stay with
    /// `SamplingParams::validate`.
    fn from(s: &Sampling) -> Self {
        Self {
            temperature: s.temperature,
            top_k: (s.top_k != 0).then_some(s.top_k),
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
        }
    }
}

impl From<&shoal_model_shards::sampler::SamplingParams> for Sampling {
    /// The wire form of the engine's parameters (`top_k` `None` becomes 0).
    fn from(p: &shoal_model_shards::sampler::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k.unwrap_or(0),
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
        }
    }
}

/// Opens a session on one hop of a route (kind 1). The origin sends it down the chain; each
/// stage forwards it with `hop_index + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenSession {
    /// Random session id chosen by the origin.
    pub session_id: u64,
    /// Identity of the model (hash of its layout and weights).
    pub model_id: [u8; 32],
    /// Node id of the origin: where the last stage sends results and any stage sends errors.
    pub origin: [u8; 32],
    /// The whole route, stage 1 first.
    pub route: Vec<RouteHop>,
    /// Which hop of `route` the receiver is.
    pub hop_index: u32,
    /// Dtype of hidden states between stages.
    pub wire_dtype: WireDType,
    /// Most positions (prompt and generated) the session may use; sizes the KV cache.
    pub max_len: u32,
    /// Sampling parameters for the last stage.
    pub sampling: Sampling,
    /// How many top alternatives each [`StepResult`] reports.
    pub top_logprobs: u8,
    /// Prompt tokens at the start of the history (penalties treat them apart).
    pub prompt_len: u32,
    /// How to reach the route's nodes and the origin (hints; may be empty).
    pub address_book: Vec<NodeAddrs>,
    /// The origin's ephemeral X25519 key when the session's steps carry their sampler inputs
    /// sealed for the last hop ([`seal`]); `None` when they travel in the clear.
    pub seal: Option<[u8; 32]>,
}

/// Hidden states between stages: `t × hidden` values, row-major, little-endian.
///
/// The codec checks the byte count against the shape; finiteness and the match with the
/// session's dtype and the model's width are checked by the stage service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenStates {
    /// Rows (tokens).
    pub t: u32,
    /// Row width (the model's hidden size).
    pub hidden: u32,
    /// Element type.
    pub dtype: WireDType,
    /// `t × hidden × dtype.size()` bytes.
    pub bytes: Vec<u8>,
}

/// The input of a step: token ids for stage 1, hidden states for the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Token ids (tag 1).
    Tokens(Vec<u32>),
    /// Hidden states (tag 2).
    Hidden(HiddenStates),
}

impl Payload {
    /// Tokens this payload covers (ids, or rows of hidden states).
    pub fn len(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(h) => h.t as usize,
        }
    }

    /// Whether the payload covers no token (never true of a decoded step).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One step of a session (kind 2): a prefill chunk or one decode token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The session.
    pub session_id: u64,
    /// Monotonic per session.
    pub step_id: u64,
    /// Position of the payload's first token.
    pub start_pos: u32,
    /// Index `t` of the token this step generates (for the deterministic draw).
    pub sample_step: u64,
    /// Ids appended to the history since the previous step, passed through to the last stage.
    pub history_tail: Vec<u32>,
    /// Speculative decoding: the ids the origin guesses follow the payload's first id (at most
    /// [`MAX_DRAFT`]). Empty for an ordinary step. When not empty, the payload covers exactly
    /// `1 + draft.len()` positions (the last sampled id, then the draft), every stage computes
    /// each row with the bits a one-position step would give it, and the last stage answers
    /// with the sampler's choice at each position up to the first that differs from the draft
    /// (see [`StepResult::accepted`]). Passed through unchanged.
    pub draft: Vec<u32>,
    /// The ids the sampled token may take (a constrained step); `None` allows all. Passed
    /// through to the last stage.
    pub mask: Option<TokenMask>,
    /// In a sealed session: `history_tail`, the draft ids and `mask`, sealed for the last
    /// stage ([`seal`]). The step then carries an empty `history_tail`, no mask and a draft
    /// of zeros (its length is what the stages in between need). Passed through unchanged.
    pub sealed: Option<Vec<u8>>,
    /// The stage's input.
    pub payload: Payload,
}

/// One sampled id of a [`StepResult`] with its log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    /// The id.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely alternatives, `(id, logprob)`, when the session asked for them.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The last stage's answer to a step (kind 3).
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// The session.
    pub session_id: u64,
    /// The step answered.
    pub step_id: u64,
    /// The sampled token id.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely alternatives, `(id, logprob)`, when the session asked for them.
    pub top_logprobs: Vec<(u32, f32)>,
    /// On a speculative step: the draft ids the sampler chose too, in order, each with its
    /// log-probabilities (at most [`MAX_DRAFT`]). `token` then comes after them: the choice at
    /// the first position where the draft was wrong, or after the whole draft. Empty for an
    /// ordinary step.
    pub accepted: Vec<Chosen>,
}

/// Why a session closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Generation finished (1).
    Completed,
    /// The HTTP client went away (2).
    ClientDisconnected,
    /// The session was idle too long (3).
    IdleTimeout,
    /// The origin moved the session to another route (4).
    Rerouted,
    /// An error ended the session (5).
    Error,
    /// The origin is shutting down (6).
    Shutdown,
}

impl CloseReason {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Completed => 1,
            Self::ClientDisconnected => 2,
            Self::IdleTimeout => 3,
            Self::Rerouted => 4,
            Self::Error => 5,
            Self::Shutdown => 6,
        }
    }

    /// The reason of a wire code, or `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Completed,
            2 => Self::ClientDisconnected,
            3 => Self::IdleTimeout,
            4 => Self::Rerouted,
            5 => Self::Error,
            6 => Self::Shutdown,
            _ => return None,
        })
    }
}

/// Closes a session and frees its KV cache on every stage (kind 4); travels down the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseSession {
    /// The session.
    pub session_id: u64,
    /// Why.
    pub reason: CloseReason,
}

/// What went wrong, as a stage reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame failed to decode (1).
    Malformed,
    /// A frame or field exceeded a limit (2).
    TooLarge,
    /// The session is not open on this stage (3).
    UnknownSession,
    /// Dtype, width or length does not match the session or model (4).
    BadShape,
    /// Hidden states or parameters hold NaN or infinity (5).
    NonFinite,
    /// Positions do not follow the session's KV cache or exceed `max_len` (6).
    BadPosition,
    /// The KV budget cannot hold the session (7).
    CapacityExceeded,
    /// The peer's session quota is used up (8).
    QuotaExceeded,
    /// The stage serves as many sessions as it can (9).
    SessionLimit,
    /// The stage is draining and takes no new sessions (10).
    Draining,
    /// The stage does not serve this model (11).
    WrongModel,
    /// The stage does not serve the requested span of layers (12).
    WrongSpan,
    /// A bug or an engine failure on the stage (13).
    Internal,
    /// A session with this id is already open (14).
    DuplicateSession,
    /// A step id did not increase (15).
    OutOfOrder,
    /// A requested feature (dtype, sampling option) is not supported here (16).
    Unsupported,
    /// The stage could not reach or lost the next hop (17).
    NextHopUnreachable,
    /// A deadline passed (18).
    Timeout,
}

impl ErrorCode {
    const ALL: [Self; 18] = [
        Self::Malformed,
        Self::TooLarge,
        Self::UnknownSession,
        Self::BadShape,
        Self::NonFinite,
        Self::BadPosition,
        Self::CapacityExceeded,
        Self::QuotaExceeded,
        Self::SessionLimit,
        Self::Draining,
        Self::WrongModel,
        Self::WrongSpan,
        Self::Internal,
        Self::DuplicateSession,
        Self::OutOfOrder,
        Self::Unsupported,
        Self::NextHopUnreachable,
        Self::Timeout,
    ];

    /// The wire code (1..=18).
    pub fn code(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::TooLarge => 2,
            Self::UnknownSession => 3,
            Self::BadShape => 4,
            Self::NonFinite => 5,
            Self::BadPosition => 6,
            Self::CapacityExceeded => 7,
            Self::QuotaExceeded => 8,
            Self::SessionLimit => 9,
            Self::Draining => 10,
            Self::WrongModel => 11,
            Self::WrongSpan => 12,
            Self::Internal => 13,
            Self::DuplicateSession => 14,
            Self::OutOfOrder => 15,
            Self::Unsupported => 16,
            Self::NextHopUnreachable => 17,
            Self::Timeout => 18,
        }
    }

    /// The error code of a wire code, or `None` for an unknown code.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An error reported by a stage (kind 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    /// The session concerned, if any.
    pub session_id: Option<u64>,
    /// The step concerned, if any.
    pub step_id: Option<u64>,
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail, at most [`MAX_ERROR_MESSAGE`] bytes.
    pub message: String,
}

impl StageError {
    /// An error whose message is cut (at a character boundary) to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn new(code: ErrorCode, session_id: Option<u64>, step_id: Option<u64>, message: &str) -> Self {
        let mut end = message.len().min(MAX_ERROR_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Self { session_id, step_id, code, message: message[..end].to_owned() }
    }
}

/// Every message of the stage protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Kind 1.
    OpenSession(OpenSession),
    /// Kind 2.
    Step(Step),
    /// Kind 3.
    StepResult(StepResult),
    /// Kind 4.
    CloseSession(CloseSession),
    /// Kind 5.
    Error(StageError),
    /// Kind 6: asks for a [`Message::Pong`] with the same nonce.
    Ping {
        /// Echoed by the pong.
        nonce: u64,
    },
    /// Kind 7: answers a [`Message::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
        /// The responder's span and load, when it serves layers.
        info: Option<PeerInfo>,
    },
    /// Kind 8.
    Tap(Tap),
    /// Kind 9.
    StageOutput(StageOutput),
}

/// Asks every stage of a session's chain for a copy of its output of one step (kind 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tap {
    /// The session.
    pub session_id: u64,
    /// The step whose outputs the origin wants.
    pub step_id: u64,
}

/// The hidden states a stage forwarded for a tapped step, sent to the origin (kind 9).
#[derive(Debug, Clone, PartialEq)]
pub struct StageOutput {
    /// The session.
    pub session_id: u64,
    /// The step.
    pub step_id: u64,
    /// Exactly the payload the stage forwarded to the next hop.
    pub hidden: HiddenStates,
}

const KIND_OPEN: u8 = 1;
const KIND_STEP: u8 = 2;
const KIND_RESULT: u8 = 3;
const KIND_CLOSE: u8 = 4;
const KIND_ERROR: u8 = 5;
const KIND_PING: u8 = 6;
const KIND_PONG: u8 = 7;
const KIND_TAP: u8 = 8;
const KIND_OUTPUT: u8 = 9;
const TAG_TOKENS: u8 = 1;
const TAG_HIDDEN: u8 = 2;
const TAG_NO_MASK: u8 = 0;
const TAG_MASK_ALLOW: u8 = 1;
const TAG_MASK_BITS: u8 = 2;

impl Message {
    /// The kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::OpenSession(_) => KIND_OPEN,
            Self::Step(_) => KIND_STEP,
            Self::StepResult(_) => KIND_RESULT,
            Self::CloseSession(_) => KIND_CLOSE,
            Self::Error(_) => KIND_ERROR,
            Self::Ping { .. } => KIND_PING,
            Self::Pong { .. } => KIND_PONG,
            Self::Tap(_) => KIND_TAP,
            Self::StageOutput(_) => KIND_OUTPUT,
        }
    }

    /// The kind's name, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// Length of the encoded body (without the 4-byte header).
    pub fn body_len(&self) -> usize {
        1 + match self {
            Self::OpenSession(m) => {
                8 + 32
                    + 32
                    + 4
                    + 40 * m.route.len()
                    + 4
                    + 1
                    + 4
                    + 36
                    + 1
                    + 4
                    + 4
                    + m.address_book
                        .iter()
                        .map(|e| 33 + e.addrs.iter().map(addr_len).sum::<usize>())
                        .sum::<usize>()
                    + 1
                    + if m.seal.is_some() { 32 } else { 0 }
            }
            Self::Step(m) => {
                let payload = match &m.payload {
                    Payload::Tokens(ids) => 4 + 4 * ids.len(),
                    Payload::Hidden(h) => 4 + 4 + 1 + 4 + h.bytes.len(),
                };
                let mask = match &m.mask {
                    None => 1,
                    Some(TokenMask::Allow(w) | TokenMask::Bits(w)) => 1 + 4 + 4 * w.len(),
                };
                let sealed = 1 + m.sealed.as_ref().map_or(0, |b| 4 + b.len());
                8 + 8
                    + 4
                    + 8
                    + 4
                    + 4 * m.history_tail.len()
                    + 4
                    + 4 * m.draft.len()
                    + mask
                    + sealed
                    + 1
                    + payload
            }
            Self::StepResult(m) => {
                8 + 8
                    + 4
                    + 4
                    + 4
                    + 8 * m.top_logprobs.len()
                    + 4
                    + m.accepted.iter().map(|c| 4 + 4 + 4 + 8 * c.top_logprobs.len()).sum::<usize>()
            }
            Self::CloseSession(_) => 8 + 1,
            Self::Error(m) => {
                1 + 8 * usize::from(m.session_id.is_some())
                    + 1
                    + 8 * usize::from(m.step_id.is_some())
                    + 2
                    + 4
                    + m.message.len()
            }
            Self::Ping { .. } => 8,
            Self::Pong { info, .. } => 8 + 1 + if info.is_some() { 32 + 4 + 4 + 4 + 1 + 4 + 8 } else { 0 },
            Self::Tap(_) => 8 + 8,
            Self::StageOutput(m) => 8 + 8 + 4 + 4 + 1 + 4 + m.hidden.bytes.len(),
        }
    }

    /// Checks everything the decoder checks, so a sender can refuse to send what a receiver
    /// would reject (see [`try_encode`]). Decoded messages always pass.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            Self::OpenSession(m) => validate_open(m),
            Self::Step(m) => validate_step(m),
            Self::StepResult(m) => validate_result(m),
            Self::CloseSession(_) | Self::Ping { .. } | Self::Tap(_) => Ok(()),
            Self::StageOutput(m) => validate_hidden(&m.hidden),
            Self::Pong { info, .. } => match info {
                Some(i) if i.start >= i.end || i.end > i.n_layers => Err(ProtocolError::BadRoute {
                    index: 0,
                    start: i.start,
                    end: i.end,
                    problem: "is not a span of the model's layers",
                }),
                _ => Ok(()),
            },
            Self::Error(m) => check_count("message", m.message.len(), MAX_ERROR_MESSAGE),
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_OPEN => "OpenSession",
        KIND_STEP => "Step",
        KIND_RESULT => "StepResult",
        KIND_CLOSE => "CloseSession",
        KIND_ERROR => "Error",
        KIND_PING => "Ping",
        KIND_PONG => "Pong",
        KIND_TAP => "Tap",
        KIND_OUTPUT => "StageOutput",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Validation shared by the decoder and `try_encode`.

fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), ProtocolError> {
    if count > max {
        return Err(ProtocolError::TooMany { field, count: count as u64, max: max as u64 });
    }
    Ok(())
}

fn check_finite(field: &'static str, value: f32) -> Result<(), ProtocolError> {
    if value.is_finite() { Ok(()) } else { Err(ProtocolError::NonFinite { field, value }) }
}

/// Logprobs may be `-∞` (a token of zero probability) but never NaN or `+∞`.
fn check_logprob(field: &'static str, value: f32) -> Result<(), ProtocolError> {
    if value.is_nan() || value == f32::INFINITY {
        return Err(ProtocolError::NonFinite { field, value });
    }
    Ok(())
}

fn validate_open(m: &OpenSession) -> Result<(), ProtocolError> {
    check_count("route", m.route.len(), MAX_ROUTE_HOPS)?;
    if m.route.is_empty() {
        return Err(ProtocolError::Empty { field: "route" });
    }
    let mut expected_start = 0u32;
    for (index, hop) in m.route.iter().enumerate() {
        let problem = if hop.start >= hop.end {
            Some("is empty or reversed")
        } else if hop.start != expected_start {
            Some(if index == 0 {
                "does not start at layer 0"
            } else {
                "does not start where the previous hop ends"
            })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(ProtocolError::BadRoute { index, start: hop.start, end: hop.end, problem });
        }
        expected_start = hop.end;
    }
    if m.hop_index as usize >= m.route.len() {
        return Err(ProtocolError::BadHopIndex { hop_index: m.hop_index, hops: m.route.len() });
    }
    if m.max_len == 0 {
        return Err(ProtocolError::Empty { field: "max_len" });
    }
    if m.prompt_len > m.max_len {
        return Err(ProtocolError::PromptTooLong { prompt_len: m.prompt_len, max_len: m.max_len });
    }
    check_count("top_logprobs", usize::from(m.top_logprobs), MAX_TOP_LOGPROBS)?;
    check_count("address_book", m.address_book.len(), MAX_ROUTE_HOPS + 1)?;
    for entry in &m.address_book {
        check_count("address_book.addrs", entry.addrs.len(), MAX_NODE_ADDRS)?;
    }
    let s = &m.sampling;
    check_finite("sampling.temperature", s.temperature)?;
    check_finite("sampling.top_p", s.top_p)?;
    check_finite("sampling.min_p", s.min_p)?;
    check_finite("sampling.repetition_penalty", s.repetition_penalty)?;
    check_finite("sampling.presence_penalty", s.presence_penalty)?;
    check_finite("sampling.frequency_penalty", s.frequency_penalty)?;
    Ok(())
}

fn check_hidden_size(h: &HiddenStates, actual: u64) -> Result<(), ProtocolError> {
    let expected =
        u64::from(h.t).checked_mul(u64::from(h.hidden)).and_then(|n| n.checked_mul(h.dtype.size() as u64));
    if expected != Some(actual) {
        return Err(ProtocolError::HiddenSizeMismatch {
            t: h.t,
            hidden: h.hidden,
            dtype_size: h.dtype.size(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Hidden states of a step or a stage output: a non-zero width and exactly `t × hidden`
/// values (the row count is checked by the caller: it may not be zero in a step).
fn validate_hidden(h: &HiddenStates) -> Result<(), ProtocolError> {
    check_count("hidden.t", h.t as usize, MAX_STEP_TOKENS)?;
    if h.t == 0 {
        return Err(ProtocolError::Empty { field: "hidden.t" });
    }
    if h.hidden == 0 {
        return Err(ProtocolError::Empty { field: "hidden.hidden" });
    }
    check_hidden_size(h, h.bytes.len() as u64)
}

/// Checks a step as the decoder does (also the ids a stage opens from a sealed box).
pub(crate) fn validate_step(m: &Step) -> Result<(), ProtocolError> {
    check_count("history_tail", m.history_tail.len(), MAX_HISTORY_TAIL)?;
    let (field, len) = match &m.payload {
        Payload::Tokens(ids) => ("tokens", ids.len()),
        Payload::Hidden(h) => ("hidden.t", h.t as usize),
    };
    check_count(field, len, MAX_STEP_TOKENS)?;
    if len == 0 {
        return Err(ProtocolError::Empty { field });
    }
    if let Payload::Hidden(h) = &m.payload {
        validate_hidden(h)?;
    }
    // `len ≤ MAX_STEP_TOKENS` fits a u32.
    let len = len as u32;
    if m.start_pos.checked_add(len).is_none() {
        return Err(ProtocolError::PositionOverflow { start_pos: m.start_pos, len });
    }
    check_count("draft", m.draft.len(), MAX_DRAFT)?;
    if !m.draft.is_empty() && len as usize != m.draft.len() + 1 {
        return Err(ProtocolError::DraftMismatch { draft: m.draft.len(), positions: len as usize });
    }
    if let Some(mask) = &m.mask {
        let (TokenMask::Allow(words) | TokenMask::Bits(words)) = mask;
        check_count("mask", words.len(), MAX_MASK_WORDS)?;
        if words.is_empty() {
            return Err(ProtocolError::Empty { field: "mask" });
        }
        if !m.draft.is_empty() {
            return Err(ProtocolError::MaskedDraft);
        }
    }
    if let Some(b) = &m.sealed {
        check_count("sealed", b.len(), seal::MAX_SEALED)?;
        if !m.history_tail.is_empty() || m.mask.is_some() || m.draft.iter().any(|&id| id != 0) {
            return Err(ProtocolError::UnsealedIds);
        }
    }
    Ok(())
}

fn validate_result(m: &StepResult) -> Result<(), ProtocolError> {
    check_logprob("logprob", m.logprob)?;
    check_count("top_logprobs", m.top_logprobs.len(), MAX_TOP_LOGPROBS)?;
    for &(_, lp) in &m.top_logprobs {
        check_logprob("top_logprobs.logprob", lp)?;
    }
    check_count("accepted", m.accepted.len(), MAX_DRAFT)?;
    for c in &m.accepted {
        check_logprob("accepted.logprob", c.logprob)?;
        check_count("accepted.top_logprobs", c.top_logprobs.len(), MAX_TOP_LOGPROBS)?;
        for &(_, lp) in &c.top_logprobs {
            check_logprob("accepted.top_logprobs.logprob", lp)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoding.

/// Encodes one message as a frame (4-byte length header, then the body).
///
/// Does not validate: encoding a message the decoder would reject (an over-long error
/// message, a NaN temperature) produces a frame the receiver refuses. Use [`try_encode`] for
/// values that did not come from this node's own checked code.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + msg.body_len());
    encode_into(msg, &mut out);
    out
}

/// Validates ([`Message::validate`]) and encodes, refusing frames over [`MAX_FRAME`].
pub fn try_encode(msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    msg.validate()?;
    let len = msg.body_len();
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len: len as u64, max: MAX_FRAME });
    }
    Ok(encode(msg))
}

/// Appends one frame to `out` (reuse a buffer across steps on the hot path).
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    let len = msg.body_len();
    out.reserve(HEADER_LEN + len);
    // A body over u32::MAX cannot be framed; announce u32::MAX so the receiver rejects it
    // as too large instead of misreading the stream.
    put_u32(out, u32::try_from(len).unwrap_or(u32::MAX));
    out.push(msg.kind());
    match msg {
        Message::OpenSession(m) => {
            put_u64(out, m.session_id);
            out.extend_from_slice(&m.model_id);
            out.extend_from_slice(&m.origin);
            put_len(out, m.route.len());
            for hop in &m.route {
                out.extend_from_slice(&hop.node_id);
                put_u32(out, hop.start);
                put_u32(out, hop.end);
            }
            put_u32(out, m.hop_index);
            out.push(m.wire_dtype.code());
            put_u32(out, m.max_len);
            let s = &m.sampling;
            put_f32(out, s.temperature);
            put_u32(out, s.top_k);
            put_f32(out, s.top_p);
            put_f32(out, s.min_p);
            put_f32(out, s.repetition_penalty);
            put_f32(out, s.presence_penalty);
            put_f32(out, s.frequency_penalty);
            put_u64(out, s.seed);
            out.push(m.top_logprobs);
            put_u32(out, m.prompt_len);
            put_len(out, m.address_book.len());
            for entry in &m.address_book {
                out.extend_from_slice(&entry.node_id);
                out.push(u8::try_from(entry.addrs.len()).unwrap_or(u8::MAX));
                for addr in &entry.addrs {
                    put_addr(out, addr);
                }
            }
            match &m.seal {
                None => out.push(0),
                Some(key) => {
                    out.push(1);
                    out.extend_from_slice(key);
                }
            }
        }
        Message::Step(m) => {
            put_u64(out, m.session_id);
            put_u64(out, m.step_id);
            put_u32(out, m.start_pos);
            put_u64(out, m.sample_step);
            put_u32s(out, &m.history_tail);
            put_u32s(out, &m.draft);
            match &m.mask {
                None => out.push(TAG_NO_MASK),
                Some(TokenMask::Allow(ids)) => {
                    out.push(TAG_MASK_ALLOW);
                    put_u32s(out, ids);
                }
                Some(TokenMask::Bits(bits)) => {
                    out.push(TAG_MASK_BITS);
                    put_u32s(out, bits);
                }
            }
            match &m.sealed {
                None => out.push(0),
                Some(b) => {
                    out.push(1);
                    put_len(out, b.len());
                    out.extend_from_slice(b);
                }
            }
            match &m.payload {
                Payload::Tokens(ids) => {
                    out.push(TAG_TOKENS);
                    put_u32s(out, ids);
                }
                Payload::Hidden(h) => {
                    out.push(TAG_HIDDEN);
                    put_hidden(out, h);
                }
            }
        }
        Message::StepResult(m) => {
            put_u64(out, m.session_id);
            put_u64(out, m.step_id);
            put_u32(out, m.token);
            put_f32(out, m.logprob);
            put_pairs(out, &m.top_logprobs);
            put_len(out, m.accepted.len());
            for c in &m.accepted {
                put_u32(out, c.token);
                put_f32(out, c.logprob);
                put_pairs(out, &c.top_logprobs);
            }
        }
        Message::CloseSession(m) => {
            put_u64(out, m.session_id);
            out.push(m.reason.code());
        }
        Message::Error(m) => {
            put_opt_u64(out, m.session_id);
            put_opt_u64(out, m.step_id);
            out.extend_from_slice(&m.code.code().to_le_bytes());
            put_len(out, m.message.len());
            out.extend_from_slice(m.message.as_bytes());
        }
        Message::Ping { nonce } => put_u64(out, *nonce),
        Message::Pong { nonce, info } => {
            put_u64(out, *nonce);
            match info {
                None => out.push(0),
                Some(i) => {
                    out.push(1);
                    out.extend_from_slice(&i.model_id);
                    put_u32(out, i.start);
                    put_u32(out, i.end);
                    put_u32(out, i.n_layers);
                    out.push(u8::from(i.draining));
                    put_u32(out, i.sessions);
                    put_u64(out, i.free_kv_bytes);
                }
            }
        }
        Message::Tap(m) => {
            put_u64(out, m.session_id);
            put_u64(out, m.step_id);
        }
        Message::StageOutput(m) => {
            put_u64(out, m.session_id);
            put_u64(out, m.step_id);
            put_hidden(out, &m.hidden);
        }
    }
}

fn put_hidden(out: &mut Vec<u8>, h: &HiddenStates) {
    put_u32(out, h.t);
    put_u32(out, h.hidden);
    out.push(h.dtype.code());
    put_len(out, h.bytes.len());
    out.extend_from_slice(&h.bytes);
}

fn addr_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2,
    }
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    put_u32(out, u32::try_from(len).unwrap_or(u32::MAX));
}

fn put_u32s(out: &mut Vec<u8>, vs: &[u32]) {
    put_len(out, vs.len());
    for &v in vs {
        put_u32(out, v);
    }
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(u32, f32)]) {
    put_len(out, pairs.len());
    for &(id, lp) in pairs {
        put_u32(out, id);
        put_f32(out, lp);
    }
}

fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_u64(out, v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding.

/// Reads a frame header: the body length, checked to be in `1..=MAX_FRAME`, so a transport
/// can then read exactly that many bytes into a buffer of that size.
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(header);
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    match usize::try_from(len) {
        Ok(n) if n <= MAX_FRAME => Ok(n),
        _ => Err(ProtocolError::FrameTooLarge { len: u64::from(len), max: MAX_FRAME }),
    }
}

/// Decodes one complete frame (header and body, nothing after it).
pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    let Some((header, body)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(ProtocolError::Truncated {
            field: "frame header",
            needed: HEADER_LEN as u64,
            remaining: frame.len(),
        });
    };
    let declared = frame_len(*header)?;
    if declared != body.len() {
        return Err(ProtocolError::LengthMismatch { declared, actual: body.len() });
    }
    decode_body(body)
}

/// Decodes a frame body (the bytes after the header), with every check listed in the module
/// docs. Never panics and never allocates more than the body's own size.
pub fn decode_body(body: &[u8]) -> Result<Message, ProtocolError> {
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len: body.len() as u64, max: MAX_FRAME });
    }
    let mut r = Reader { buf: body };
    let kind = r.u8("kind")?;
    let msg = match kind {
        KIND_OPEN => Message::OpenSession(read_open(&mut r)?),
        KIND_STEP => Message::Step(read_step(&mut r)?),
        KIND_RESULT => Message::StepResult(read_result(&mut r)?),
        KIND_CLOSE => {
            let session_id = r.u64("session_id")?;
            let code = r.u8("reason")?;
            let reason = CloseReason::from_code(code).ok_or(ProtocolError::UnknownCloseReason(code))?;
            Message::CloseSession(CloseSession { session_id, reason })
        }
        KIND_ERROR => Message::Error(read_error(&mut r)?),
        KIND_PING => Message::Ping { nonce: r.u64("nonce")? },
        KIND_PONG => read_pong(&mut r)?,
        KIND_TAP => Message::Tap(Tap { session_id: r.u64("session_id")?, step_id: r.u64("step_id")? }),
        KIND_OUTPUT => Message::StageOutput(StageOutput {
            session_id: r.u64("session_id")?,
            step_id: r.u64("step_id")?,
            hidden: read_hidden(&mut r)?,
        }),
        other => return Err(ProtocolError::UnknownKind(other)),
    };
    if !r.buf.is_empty() {
        return Err(ProtocolError::TrailingBytes { kind: kind_name(kind), count: r.buf.len() });
    }
    msg.validate()?;
    Ok(msg)
}

fn read_open(r: &mut Reader<'_>) -> Result<OpenSession, ProtocolError> {
    let session_id = r.u64("session_id")?;
    let model_id = r.array("model_id")?;
    let origin = r.array("origin")?;
    let n = r.count("route", MAX_ROUTE_HOPS, 40)?;
    let mut route = Vec::with_capacity(n);
    for _ in 0..n {
        route.push(RouteHop {
            node_id: r.array("route.node_id")?,
            start: r.u32("route.start")?,
            end: r.u32("route.end")?,
        });
    }
    let hop_index = r.u32("hop_index")?;
    let code = r.u8("wire_dtype")?;
    let wire_dtype =
        WireDType::from_code(code).map_err(|_| ProtocolError::UnknownDtype { field: "wire_dtype", code })?;
    let max_len = r.u32("max_len")?;
    let sampling = Sampling {
        temperature: r.f32("sampling.temperature")?,
        top_k: r.u32("sampling.top_k")?,
        top_p: r.f32("sampling.top_p")?,
        min_p: r.f32("sampling.min_p")?,
        repetition_penalty: r.f32("sampling.repetition_penalty")?,
        presence_penalty: r.f32("sampling.presence_penalty")?,
        frequency_penalty: r.f32("sampling.frequency_penalty")?,
        seed: r.u64("sampling.seed")?,
    };
    let top_logprobs = r.u8("top_logprobs")?;
    let prompt_len = r.u32("prompt_len")?;
    // Smallest entry: a node id and a zero address count.
    let entries = r.count("address_book", MAX_ROUTE_HOPS + 1, 33)?;
    let mut address_book = Vec::with_capacity(entries);
    for _ in 0..entries {
        let node_id = r.array("address_book.node_id")?;
        let count = usize::from(r.u8("address_book.addrs")?);
        check_count("address_book.addrs", count, MAX_NODE_ADDRS)?;
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            addrs.push(r.addr("address_book.addr")?);
        }
        address_book.push(NodeAddrs { node_id, addrs });
    }
    let seal = match r.u8("seal flag")? {
        0 => None,
        1 => Some(r.array("seal")?),
        value => return Err(ProtocolError::InvalidFlag { field: "seal flag", value }),
    };
    Ok(OpenSession {
        session_id,
        model_id,
        origin,
        route,
        hop_index,
        wire_dtype,
        max_len,
        sampling,
        top_logprobs,
        prompt_len,
        address_book,
        seal,
    })
}

fn read_pong(r: &mut Reader<'_>) -> Result<Message, ProtocolError> {
    let nonce = r.u64("nonce")?;
    let info = match r.u8("info flag")? {
        0 => None,
        1 => Some(PeerInfo {
            model_id: r.array("info.model_id")?,
            start: r.u32("info.start")?,
            end: r.u32("info.end")?,
            n_layers: r.u32("info.n_layers")?,
            draining: match r.u8("info.draining")? {
                0 => false,
                1 => true,
                value => return Err(ProtocolError::InvalidFlag { field: "info.draining", value }),
            },
            sessions: r.u32("info.sessions")?,
            free_kv_bytes: r.u64("info.free_kv_bytes")?,
        }),
        value => return Err(ProtocolError::InvalidFlag { field: "info flag", value }),
    };
    Ok(Message::Pong { nonce, info })
}

fn read_step(r: &mut Reader<'_>) -> Result<Step, ProtocolError> {
    let session_id = r.u64("session_id")?;
    let step_id = r.u64("step_id")?;
    let start_pos = r.u32("start_pos")?;
    let sample_step = r.u64("sample_step")?;
    let history_tail = r.u32s("history_tail", MAX_HISTORY_TAIL)?;
    let draft = r.u32s("draft", MAX_DRAFT)?;
    let mask = match r.u8("mask tag")? {
        TAG_NO_MASK => None,
        TAG_MASK_ALLOW => Some(TokenMask::Allow(r.u32s("mask", MAX_MASK_WORDS)?)),
        TAG_MASK_BITS => Some(TokenMask::Bits(r.u32s("mask", MAX_MASK_WORDS)?)),
        tag => return Err(ProtocolError::UnknownMask(tag)),
    };
    let sealed = match r.u8("sealed flag")? {
        0 => None,
        1 => {
            let n = r.count("sealed", seal::MAX_SEALED, 1)?;
            Some(r.take(n, "sealed")?.to_vec())
        }
        value => return Err(ProtocolError::InvalidFlag { field: "sealed flag", value }),
    };
    let payload = match r.u8("payload tag")? {
        TAG_TOKENS => Payload::Tokens(r.u32s("tokens", MAX_STEP_TOKENS)?),
        TAG_HIDDEN => Payload::Hidden(read_hidden(r)?),
        tag => return Err(ProtocolError::UnknownPayload(tag)),
    };
    Ok(Step { session_id, step_id, start_pos, sample_step, history_tail, draft, mask, sealed, payload })
}

/// Hidden states as a step's payload carries them (after the tag).
fn read_hidden(r: &mut Reader<'_>) -> Result<HiddenStates, ProtocolError> {
    let t = r.u32("hidden.t")?;
    check_count("hidden.t", t as usize, MAX_STEP_TOKENS)?;
    let hidden = r.u32("hidden.hidden")?;
    let code = r.u8("hidden.dtype")?;
    let dtype = WireDType::from_code(code)
        .map_err(|_| ProtocolError::UnknownDtype { field: "hidden.dtype", code })?;
    let declared = r.u32("hidden.bytes")?;
    let shape = HiddenStates { t, hidden, dtype, bytes: Vec::new() };
    // Shape first, so a mismatch is reported as such rather than as truncation.
    check_hidden_size(&shape, u64::from(declared))?;
    let bytes = r.take(declared as usize, "hidden.bytes")?.to_vec();
    Ok(HiddenStates { bytes, ..shape })
}

fn read_result(r: &mut Reader<'_>) -> Result<StepResult, ProtocolError> {
    let session_id = r.u64("session_id")?;
    let step_id = r.u64("step_id")?;
    let token = r.u32("token")?;
    let logprob = r.f32("logprob")?;
    let top_logprobs = read_pairs(r, "top_logprobs")?;
    // Smallest entry: id, logprob and an empty list.
    let n = r.count("accepted", MAX_DRAFT, 12)?;
    let mut accepted = Vec::with_capacity(n);
    for _ in 0..n {
        accepted.push(Chosen {
            token: r.u32("accepted.token")?,
            logprob: r.f32("accepted.logprob")?,
            top_logprobs: read_pairs(r, "accepted.top_logprobs")?,
        });
    }
    Ok(StepResult { session_id, step_id, token, logprob, top_logprobs, accepted })
}

/// A list of `(id, logprob)` pairs of at most [`MAX_TOP_LOGPROBS`].
fn read_pairs(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<(u32, f32)>, ProtocolError> {
    let n = r.count(field, MAX_TOP_LOGPROBS, 8)?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        pairs.push((r.u32(field)?, r.f32(field)?));
    }
    Ok(pairs)
}

fn read_error(r: &mut Reader<'_>) -> Result<StageError, ProtocolError> {
    let session_id = r.opt_u64("session_id")?;
    let step_id = r.opt_u64("step_id")?;
    let raw = r.u16("code")?;
    let code = ErrorCode::from_code(raw).ok_or(ProtocolError::UnknownErrorCode(raw))?;
    let n = r.count("message", MAX_ERROR_MESSAGE, 1)?;
    let message = std::str::from_utf8(r.take(n, "message")?)
        .map_err(|_| ProtocolError::InvalidUtf8 { field: "message" })?
        .to_owned();
    Ok(StageError { session_id, step_id, code, message })
}

/// A cursor over a body; every read checks the remaining length first.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(ProtocolError::Truncated { field, needed: n as u64, remaining: self.buf.len() }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn f32(&mut self, field: &'static str) -> Result<f32, ProtocolError> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }

    fn addr(&mut self, field: &'static str) -> Result<SocketAddr, ProtocolError> {
        let ip = match self.u8(field)? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?)),
            value => return Err(ProtocolError::InvalidFlag { field, value }),
        };
        Ok(SocketAddr::new(ip, self.u16(field)?))
    }

    fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>, ProtocolError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => Ok(Some(self.u64(field)?)),
            value => Err(ProtocolError::InvalidFlag { field, value }),
        }
    }

    /// Reads a `u32` count and checks it against `max` and against the bytes left for
    /// `count × elem_size`, so the caller may allocate `count` elements.
    fn count(&mut self, field: &'static str, max: usize, elem_size: usize) -> Result<usize, ProtocolError> {
        let raw = self.u32(field)?;
        let n = usize::try_from(raw).unwrap_or(usize::MAX);
        if n > max {
            return Err(ProtocolError::TooMany { field, count: u64::from(raw), max: max as u64 });
        }
        let needed = u64::from(raw) * elem_size as u64;
        if needed > self.buf.len() as u64 {
            return Err(ProtocolError::Truncated { field, needed, remaining: self.buf.len() });
        }
        Ok(n)
    }

    fn u32s(&mut self, field: &'static str, max: usize) -> Result<Vec<u32>, ProtocolError> {
        let n = self.count(field, max, 4)?;
        let bytes = self.take(n * 4, field)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

pub mod seal;

#[cfg(test)]
mod tests;
