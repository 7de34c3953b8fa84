//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//!
//! A request becomes the same [`Job`] as a chat completion (one choice) and goes through the
//! same admission, deadlines, metrics, stop strings and streaming text assembly
//! ([`crate::handlers`]); only its parsing and the shapes of its answers are Anthropic's:
//! - `system` (a string or text blocks) becomes the template's system message; `messages`
//!   alternate `user` and `assistant`, their `content` a string or text blocks (other block
//!   types are a 400 naming them); a final `assistant` message is a prefill the answer
//!   continues (its text follows the rendered generation prompt).
//! - `max_tokens` is required; `stop_sequences`, `temperature`, `top_p`, `top_k`, `stream`,
//!   `metadata` are taken; sampling fields left out get the server's defaults
//!   ([`crate::defaults`]).
//! - The answer is a `message` with one `text` block, `stop_reason` (`end_turn`,
//!   `max_tokens`, `stop_sequence` with the matched `stop_sequence`) and `usage`
//!   (`input_tokens`, `output_tokens`). Streamed: `message_start`, `content_block_start`,
//!   `ping`, `content_block_delta`s, `content_block_stop`, `message_delta` (stop reason and
//!   usage), `message_stop`, each an SSE event named by its type; a failure mid-stream is one
//!   `error` event.
//! - Errors are `{"type": "error", "error": {"type", "message"}}` with the same statuses as
//!   the OpenAI endpoints (types `invalid_request_error`, `authentication_error`,
//!   `not_found_error`, `request_too_large`, `rate_limit_error`, `overloaded_error`).
//! - Keys: `x-api-key: KEY` (Anthropic's header) or `Authorization: Bearer KEY`, the same
//!   keys as the rest of `/v1`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_model_shards::chat_template::ChatMessage;

use crate::schema::{Common, Kind, Stop, parse};
use crate::{ApiError, ApiState, handlers};

/// A string, or a list of content blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    user_id: Option<String>,
}

/// `POST /v1/messages` (and, without `max_tokens`, `count_tokens`).
#[derive(Debug, Deserialize)]
struct MessagesBody {
    model: Option<String>,
    messages: Vec<Message>,
    system: Option<Content>,
    max_tokens: Option<i64>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stream: Option<bool>,
    metadata: Option<Metadata>,
    tools: Option<Vec<Value>>,
}

/// The text of `content`: a string, or text blocks joined.
fn text_of(content: Content, what: &str) -> Result<String, ApiError> {
    match content {
        Content::Text(t) => Ok(t),
        Content::Blocks(blocks) => {
            let mut s = String::new();
            for b in blocks {
                if b.kind != "text" {
                    return Err(ApiError::invalid(
                        format!(
                            "{what}: content blocks of type `{}` are not supported (only `text`)",
                            b.kind
                        ),
                        Some("messages"),
                    ));
                }
                let t = b.text.ok_or_else(|| {
                    ApiError::invalid(format!("{what}: a text block needs `text`"), Some("messages"))
                })?;
                s.push_str(&t);
            }
            Ok(s)
        }
    }
}

impl MessagesBody {
    /// The prompt's token ids: the chat template over `system` and `messages`, a final
    /// assistant message appended after the generation prompt.
    fn prompt_ids(&mut self, state: &ApiState) -> Result<Vec<u32>, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools are not supported by this server", Some("tools")));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages: at least one message is required", Some("messages")));
        }
        let template = state
            .model
            .chat_template
            .as_ref()
            .ok_or_else(|| ApiError::invalid("this model has no chat template", None))?;
        let mut chat = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = self.system.take() {
            let text = text_of(system, "system")?;
            if !text.is_empty() {
                chat.push(ChatMessage::new("system", text));
            }
        }
        for (i, m) in self.messages.drain(..).enumerate() {
            if m.role != "user" && m.role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages.{i}.role: `{}` is not one of `user`, `assistant`", m.role),
                    Some("messages"),
                ));
            }
            let text = text_of(m.content, &format!("messages.{i}"))?;
            chat.push(ChatMessage::new(m.role, text));
        }
        let prefill = match chat.last() {
            Some(last) if last.role == "assistant" => chat.pop().map(|m| m.content),
            _ => None,
        };
        let mut text =
            template.render(&chat, true).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        if let Some(p) = prefill {
            text.push_str(p.trim_end());
        }
        state
            .model
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
    }

    /// The fields the OpenAI endpoints share, as Anthropic's body gives them.
    fn common(&mut self) -> Result<Common, ApiError> {
        let max_tokens = self
            .max_tokens
            .ok_or_else(|| ApiError::invalid("max_tokens: Field required", Some("max_tokens")))?;
        if let Some(user) = self.metadata.take().and_then(|m| m.user_id) {
            tracing::debug!(user = %user.chars().take(64).collect::<String>(), "request");
        }
        Ok(Common {
            model: self.model.take(),
            max_tokens: Some(max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop_sequences.take().map(Stop::Many),
            stream: self.stream,
            ..Common::default()
        })
    }
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let job = handlers::prepare(&state, body, |state, body| {
        let mut body: MessagesBody = parse(body)?;
        let common = body.common()?;
        let prompt = body.prompt_ids(state)?;
        state.job(Kind::Messages, prompt, common, None, "messages", None)
    })
    .await;
    match job {
        Ok(job) => handlers::serve(state, job, arrived).await,
        Err(e) => e.into_anthropic_response(),
    }
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, the prompt a `/v1/messages`
/// request with the same `system` and `messages` would have.
pub(crate) async fn count_tokens(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let counted = handlers::prepare(&state, body, |state, body| {
        let mut body: MessagesBody = parse(body)?;
        if let Some(m) = &body.model
            && m != &state.model.name
        {
            return Err(ApiError::not_found(
                format!("the model `{m}` does not exist; this node serves `{}`", state.model.name),
                Some("model"),
                "model_not_found",
            ));
        }
        body.prompt_ids(state).map(|ids| ids.len())
    })
    .await;
    match counted {
        Ok(n) => Json(json!({"input_tokens": n})).into_response(),
        Err(e) => e.into_anthropic_response(),
    }
}

/// Anthropic's `stop_reason` and `stop_sequence` of a choice that ended with OpenAI's
/// `finish` (`stop` or `length`) and, maybe, a matched stop string.
pub(crate) fn stop_reason(finish: &str, stop_sequence: Option<&str>) -> (&'static str, Value) {
    match (stop_sequence, finish) {
        (Some(s), _) => ("stop_sequence", json!(s)),
        (None, "length") => ("max_tokens", Value::Null),
        (None, _) => ("end_turn", Value::Null),
    }
}

/// The `message` object (`content` empty and no stop reason at `message_start`).
pub(crate) fn message(
    id: &str,
    model: &str,
    text: Option<&str>,
    stop: Option<(&'static str, Value)>,
    input_tokens: usize,
    output_tokens: usize,
) -> Value {
    let content = match text {
        Some(t) => json!([{"type": "text", "text": t}]),
        None => json!([]),
    };
    let (reason, sequence) = stop.map_or((Value::Null, Value::Null), |(r, s)| (json!(r), s));
    json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": content,
           "stop_reason": reason, "stop_sequence": sequence,
           "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}})
}

/// The events that open a streamed message, before its first text.
pub(crate) fn opening_events(id: &str, model: &str, input_tokens: usize) -> [Value; 3] {
    [
        json!({"type": "message_start", "message": message(id, model, None, None, input_tokens, 0)}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
    ]
}

/// One piece of streamed text.
pub(crate) fn text_delta(text: &str) -> Value {
    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
}

/// The events that close a streamed message.
pub(crate) fn closing_events(stop: (&'static str, Value), output_tokens: usize) -> [Value; 3] {
    [
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": stop.0, "stop_sequence": stop.1},
               "usage": {"output_tokens": output_tokens}}),
        json!({"type": "message_stop"}),
    ]
}
